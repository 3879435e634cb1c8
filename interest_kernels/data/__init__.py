"""Data for the CTR models: loaders for the Amazon (DIEN layout), Taobao and MovieLens files,
and a generator of small files in the Amazon and Taobao layouts with a planted signal (the
default source)."""
from .amazon import load_amazon
from .common import (
    Batch, BatchIterator, DataFormatError, Dataset, FeatureSpec, LoadStats, Samples, Vocab, hold_out_users,
)
from .movielens import load_movielens
from .synthetic import generate_amazon, generate_taobao
from .taobao import load_taobao

__all__ = [
    "Batch", "BatchIterator", "DataFormatError", "Dataset", "FeatureSpec", "LoadStats", "Samples", "Vocab",
    "generate_amazon", "generate_taobao", "hold_out_users", "load_amazon", "load_movielens", "load_taobao",
]
