"""Availability forecasting: device histories, features, baselines and the `AvailabilityForecast` model."""
