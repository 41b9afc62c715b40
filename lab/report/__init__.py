"""Results of a run, the HTML report and the regression gate."""
