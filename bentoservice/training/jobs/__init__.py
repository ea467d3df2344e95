"""Jobs: the SQL job store, the queue, the runner process, progress events, the hand-off to serving."""
