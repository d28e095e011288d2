"""Site data: datalists, MONAI transforms and datasets, synthetic sites."""
