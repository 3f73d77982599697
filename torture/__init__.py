"""`make torture`: faults fleets meet every week, against the real daemon and real servers, counted."""
