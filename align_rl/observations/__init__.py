"""Point observations off the grid (docs/method.md §3.1): IODA-v2 files and tables, the interpolating
observation operator, quality control and observation-space scores.

- :mod:`.variables`: IODA variable names -> state channels, with their units;
- :mod:`.records`: :class:`~.records.ObsRecords`, observations in physical units, validated;
- :mod:`.ioda`, :mod:`.table`: reading and writing IODA-v2 files and CSV/Parquet tables;
- :mod:`.operator`: the interpolating operator ``H`` and :class:`~.operator.PointObservations`
  (normalised units, one batch row per analysis time);
- :mod:`.qc`: background check and the paper's reference filter;
- :mod:`.scores`: O−B and O−A statistics;
- :mod:`.network`: a synthetic observing network (radiosondes, surface stations).
"""
