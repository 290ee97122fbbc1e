"""Learning code: models, datasets, partitioners, local training, metrics. Knows nothing of MQTT."""
