"""edgepack: convert, quantize, gate, sign and run ML models on edge devices, offline."""

__version__ = "0.1.0"
