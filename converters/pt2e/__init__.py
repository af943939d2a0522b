"""PT2E helpers of the converter (torch.export + torchao's quantize_pt2e, lowered by litert-torch):
the quantizer, calibration, sensitivity and bias correction the TFLite recipes build on."""
