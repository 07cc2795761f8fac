"""Data sources: reading files into rows (`readers`: JSONL, JSON, CSV, Parquet, Arrow, plain or compressed) and the
named input formats that map a source's rows onto the three row shapes (`formats`). The data_prep stage reads its
sources with them and preflight samples them: a module below both."""
