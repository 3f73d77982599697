"""spoold: a spool-directory daemon for robotics and camera fleets."""

__version__ = "0.1.0"
