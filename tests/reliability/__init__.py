"""Reliability and security suite: faults, hostile answers, bad inputs, load and secrets, with a report.

A package (this file) so its modules import as ``reliability.*`` and its conftest does not
replace ``conftest`` in ``sys.modules`` for the tests beside it.
"""
