"""The pipeline's scorers: each gives every candidate a score in [0, 1]; `picker` weighs them
(`proxy.weights`)."""
