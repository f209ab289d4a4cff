"""Reading a study back: trial tables, the best run, the paper's comparison of methods, plots,
exports and reproduction of a stored trial, with their command line."""
