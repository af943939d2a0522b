"""Histogram calibration (entropy, percentile, distribution) in memory that does not grow with the data.

onnxruntime's histogram calibrators hold every batch's activations until the end of ``collect_data``:
its collector sizes each tensor's bins from the first call's range, so feeding it one range of batches
at a time (as ``CalibStridedMinMax`` does for min-max) gives a tensor near zero in the first range
millions of bins later, and drops values below the first range's. Here the same calibrator's session
runs the data twice, one range of batches at a time: the first pass keeps each tensor's running range,
the second bins every range into fixed bins made from that range. The histograms are the ones
onnxruntime builds from all the data in one call (the same bins, counts summed over the ranges), so
its own threshold search gives the same ranges; memory holds one range of activations and the
histograms, whatever the number of samples, and batches of unequal size (the last one) are fine.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


def _collector_class():
    from onnxruntime.quantization.calibrate import HistogramCollector

    class StreamingHistogramCollector(HistogramCollector):
        """ORT's HistogramCollector in two passes: ranges first (``binning`` False), then fixed bins."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.binning = False
            #: tensor -> (min, max, min of |x|, max of |x|), each in the tensor's own dtype
            self.ranges: dict[str, tuple] = {}

        @property
        def absolute(self) -> bool:
            # ORT bins |x| for a symmetric percentile, x itself otherwise (see collect())
            return self.method == "percentile" and self.symmetric

        def collect(self, name_to_arr):
            for tensor, arrays in name_to_arr.items():
                chunks = arrays if isinstance(arrays, list) else [arrays]
                data = np.concatenate([np.asarray(chunk).ravel() for chunk in chunks])
                if self.binning:
                    self._bin(tensor, data)
                else:
                    self._range(tensor, data)

        def _range(self, tensor: str, data: np.ndarray) -> None:
            if data.size == 0:
                zero = np.array(0, dtype=data.dtype)
                found = (zero, zero, zero, zero)
            else:
                magnitude = np.abs(data)
                found = (np.nanmin(data), np.nanmax(data), np.nanmin(magnitude), np.nanmax(magnitude))
            old = self.ranges.get(tensor)
            if old is not None:
                found = (min(old[0], found[0]), max(old[1], found[1]), min(old[2], found[2]), max(old[3], found[3]))
            self.ranges[tensor] = found

        def _bin(self, tensor: str, data: np.ndarray) -> None:
            low, high, low_magnitude, high_magnitude = self.ranges[tensor]
            if self.absolute:
                counts, edges = np.histogram(np.abs(data), bins=self.num_bins, range=(low_magnitude, high_magnitude))
                entry = (counts, edges.astype(data.dtype), low, high)
            else:
                threshold = np.array(max(abs(low), abs(high)), dtype=data.dtype)
                counts, edges = np.histogram(data, self.num_bins, range=(-threshold, threshold))
                entry = (counts, edges, low, high, threshold)
            old = self.histogram_dict.get(tensor)
            if old is not None:
                entry = (old[0] + counts, *entry[1:])
            self.histogram_dict[tensor] = entry

    return StreamingHistogramCollector


def calibrate_histograms(model: Path, reader, method, *, op_types: list[str] | None = None,
                         extra_options: dict | None = None, held_batches: int = 1):
    """onnxruntime ``TensorsData`` for ``method`` (a histogram ``CalibrationMethod``) over ``reader`` (a
    CalibrationDataReader with ``len`` and ``set_range``), ``held_batches`` batches of activations at a
    time. ``extra_options``: create_calibrator's (``percentile``, ``symmetric``, ``num_bins``...)."""
    from onnxruntime.quantization.calibrate import create_calibrator

    with tempfile.TemporaryDirectory(prefix="edgepack-calibrate-") as tmp:
        calibrator = create_calibrator(Path(model), op_types, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=method, extra_options=extra_options or {})
        collector = _collector_class()(method=calibrator.method, symmetric=calibrator.symmetric,
                                       num_bins=calibrator.num_bins, num_quantized_bins=calibrator.num_quantized_bins,
                                       percentile=calibrator.percentile, scenario=calibrator.scenario)
        calibrator.collector = collector  # collect_data makes its own only when none is set
        for binning in (False, True):
            collector.binning = binning
            for start in range(0, len(reader), held_batches):
                reader.set_range(start, start + held_batches)
                calibrator.collect_data(reader)
        data = calibrator.compute_data()
        del calibrator  # its session holds the augmented model open inside tmp
    return data
