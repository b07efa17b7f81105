"""Live video in every processor container: pytrickle's stream API, the running stream, its media."""
