"""Whole jobs built from both packages: `embed paper` (paper.py, its report paper_report.py) and `embed demo`
(demo.py). They live here, above `embedstore` and `heads`, because they use both: the core `embedstore`
package never imports `heads` or `pipelines` (tests/test_layering.py keeps it so).
"""
