"""Prefect flows that wire the crackjax stages into `crack-train` and `crack-predict`."""
