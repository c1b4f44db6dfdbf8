/* See next_a.c. */
int marker(void) { return 2; }
