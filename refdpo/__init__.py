"""refdpo: preference optimization with the reference policy as a first-class, swappable object."""

__version__ = "0.1.0"
