from tfmerge.cli import entry_point

entry_point()
