"""Datasets as a resource: registered once (an upload, or a URL on a prefix the operator allows), used by id.

The parts, one module each: ``models`` (the ``datasets`` table), ``policy`` (which URLs may be registered;
nothing is fetched before a URL passes), ``listing`` (what a URL holds and its fingerprint, through fsspec;
shared with the worker, which copies the same listing into its cache), ``service`` (register, list, delete)
and ``endpoints`` (``/datasets``). Jobs refer to one with ``dataset_id`` (``api.jobs.service``); the worker
reads it from a local cache keyed by content (``worker.datasets``).
"""
