"""The fleet protocol (topics, message schemas, signed desired states, bundle chunks) shared by the
agent and the host, and the host's fleet controller (``edgepack fleet``)."""
