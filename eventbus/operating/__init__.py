"""Tools for operators: dead letters shown and replayed, status from the admin API, the AsyncAPI document."""
