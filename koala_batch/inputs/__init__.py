"""The input: its Parquet files planned into read units, and its rows made one work row per
image, as the stages and `verify` both need them."""
