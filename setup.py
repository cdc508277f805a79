"""Packaging for synkeys."""

from setuptools import find_packages, setup

setup(
    name="synkeys",
    version="0.1.0",
    description="Matrix server key distribution (v2): key server, notary and keyring for Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["synkeys", "synkeys.*"]) + ["twisted.plugins"],
    package_data={"synkeys": ["py.typed", "storage/schema/*.sql"], "twisted": ["plugins/synkeys_plugin.py"]},
    include_package_data=False,
    zip_safe=False,
    install_requires=[
        "twisted[tls]>=22.10",
        "treq>=22.1",
        "pynacl>=1.4",
        "signedjson>=1.1.1",
        "canonicaljson>=1.6",
        "unpaddedbase64>=2.1",
        "service_identity>=21.1",
        "pyopenssl>=22.0",
        "pyyaml>=5.4",
        "attrs>=21.1",
        "idna>=3.0",
        "prometheus_client>=0.12",
    ],
    extras_require={
        "test": ["trustme>=1.0", "hypothesis>=6.0", "psycopg2-binary>=2.9"],
        "postgres": ["psycopg2-binary>=2.9"],
        "interop": ["matrix-synapse"],
        "lint": ["ruff", "mypy", "mypy-zope", "types-PyYAML"],
        "docs": ["mkdocs>=1.6", "mkdocstrings[python]>=0.25", "ruff"],
    },
    entry_points={"console_scripts": ["synkeys = synkeys.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
    ],
)
