"""Data: synthetic XCA generator, datalist builder and converters for public XCA data sets."""
