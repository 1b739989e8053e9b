package keystore

import "time"

// SetStepHook makes Put call f after each of its steps; an error from f
// fails the Put there.
func (s *Store) SetStepHook(f func(step string) error) { s.step = f }

// Put's steps, in order.
var PutSteps = []string{stepTempWritten, stepPrevLinked, stepPrevKept, stepReplaced, stepDirSynced}

// SetTimeout changes the bound of one retrieval.
func (c *Credentials) SetTimeout(d time.Duration) { c.timeout = d }
