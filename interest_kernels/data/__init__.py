"""Data for the CTR models: loaders for the Amazon (DIEN layout) and Taobao files, and a
generator of small files in those layouts with a planted signal (the default source)."""
from .amazon import load_amazon
from .common import Batch, BatchIterator, DataFormatError, Dataset, FeatureSpec, LoadStats, Samples, Vocab
from .synthetic import generate_amazon, generate_taobao
from .taobao import load_taobao

__all__ = [
    "Batch", "BatchIterator", "DataFormatError", "Dataset", "FeatureSpec", "LoadStats", "Samples", "Vocab",
    "generate_amazon", "generate_taobao", "load_amazon", "load_taobao",
]
