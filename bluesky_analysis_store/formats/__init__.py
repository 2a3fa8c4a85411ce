"""Writer/handler pairs, one format per module, and the registry that finds them."""

from ._base import FileFormat, Handler, RewindableWriter, Writer
from ._paths import confine_handler
from ._registry import ENTRY_POINT_GROUP, FormatRegistry, formats
from .hdf5 import HDF5_FORMAT, HDF5DatasetHandler, HDF5DatasetWriter
from .npy import NPY_FORMAT, NPYSeriesHandler, NPYSeriesWriter
from .parquet import PARQUET_FORMAT, ParquetTableHandler, ParquetTableWriter
from .tiff import TIFF_FORMAT, TIFFSeriesHandler, TIFFSeriesWriter

__all__ = [
    # The contract
    "FileFormat",
    "Handler",
    "RewindableWriter",
    "Writer",
    "confine_handler",
    # The registry
    "ENTRY_POINT_GROUP",
    "FormatRegistry",
    "formats",
    # The formats shipped with the package
    "HDF5_FORMAT",
    "HDF5DatasetHandler",
    "HDF5DatasetWriter",
    "NPY_FORMAT",
    "NPYSeriesHandler",
    "NPYSeriesWriter",
    "PARQUET_FORMAT",
    "ParquetTableHandler",
    "ParquetTableWriter",
    "TIFF_FORMAT",
    "TIFFSeriesHandler",
    "TIFFSeriesWriter",
]
