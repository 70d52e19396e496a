"""Reports on plans and simulations: tables, text summaries, Chrome traces and PNG plots.

Pure Python apart from matplotlib, which only `lynxpipe.report.plot` imports (lazily reached by
the CLI when it writes files), so a plain `lynxpipe compare` stays fast. Never imports torch.
"""
