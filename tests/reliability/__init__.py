"""Reliability and security suite: faults, hostile input, fuzzing, security, load (issue 9).

Every test records what it observed through the ``record`` fixture; at the end
of the session the records are merged into a JSON file that
``bench/reliability_report.py`` renders into ``docs/RELIABILITY.md``.
"""
