"""pewe: the shared library behind the entry scripts (parameter-efficient weight ensembling)."""
