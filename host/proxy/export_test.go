package proxy

// SetLastLaneStreamID makes upstream connections replace themselves after
// a few streams (tests); it returns the function that restores the default.
func SetLastLaneStreamID(v uint32) (restore func()) {
	old := lastLaneStreamID
	lastLaneStreamID = v
	return func() { lastLaneStreamID = old }
}
