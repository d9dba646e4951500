"""Pipeline stages: one module per stage (extract, train) plus the data plumbing they share."""
