"""The fleet dashboard: a live page over the registry (``edgepack fleet serve --dashboard``)."""
