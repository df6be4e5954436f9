"""The integer golden model: the one oracle every backend equals bit for bit."""
