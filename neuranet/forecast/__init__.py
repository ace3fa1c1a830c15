"""Availability forecasting: when will a device be online?

- `trace`: `DeviceHistory` (a device's known online/offline intervals, vectorised state queries,
  timelines), `read_trace` / `parse_trace` for the SETI@home trace format, `Trace` by device id.
- `features`: what the forecasters see of a device's past at a time (`feature_matrix`, `FeatureConfig`).
- `model`: `AvailabilityForecast` (fit on many devices' histories; `forecast` / `predict` /
  `expected_online_seconds` for one device; `save` / `load` with safetensors).
- `baselines`: persistence, the device's time-of-day profile, logistic regression.
- `metrics`: Brier score, log loss, calibration error. `errors`: the exception tree.
"""
