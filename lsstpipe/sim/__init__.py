"""The camera and sky simulator."""
