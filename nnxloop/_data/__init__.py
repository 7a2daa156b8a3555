"""The data feed: checking and placing batches on the mesh (`batches`), cutting a fit's data
into dispatches from an iterator (`feed`) or from batches held on the device (`staging`), and
the data position. It imports nothing of the trainer, the fit run, callbacks or saving."""
