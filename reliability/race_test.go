//go:build race

package reliability_test

// raceEnabled: the race detector's shadow memory multiplies the process's
// RSS, so the isolation suite asserts RSS only without it.
const raceEnabled = true
