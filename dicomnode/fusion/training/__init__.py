"""Training of the fusion model: the database of successful fusion results, fitting, CLI glue."""
