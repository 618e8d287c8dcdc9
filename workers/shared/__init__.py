"""What passes between the master and its workers: the board, last words, titles, exit
causes, the logger, the native thread budget."""
