"""The tests' catalog generators live in the package (the built-in demo uses them too)."""
from embedstore.synthetic_catalog import *  # noqa: F401,F403
from embedstore.synthetic_catalog import CSV_COLUMNS, CatalogInfo, class_words, make_csv_catalog, make_fashion_catalog  # noqa: F401
