package keystore

import (
	"time"

	"github.com/nitrosign/nitrosign/host/keystore/keyfile"
)

// The files' layout and the operations that need no KMS are package
// keyfile's (the CLI uses them without the AWS SDK); these are its names
// here.
const (
	DefaultPath = keyfile.DefaultPath
	PrevSuffix  = keyfile.PrevSuffix
	InitSuffix  = keyfile.InitSuffix
)

var (
	// ErrTooLarge: the file at PATH is larger than any sealed keyset
	// (FailedPrecondition).
	ErrTooLarge = keyfile.ErrTooLarge
	// ErrExists: RequestInit refused, a keyset exists.
	ErrExists = keyfile.ErrExists
)

// Info is keyfile.Info.
type Info = keyfile.Info

// PrevPath is where the keyset PATH replaced last is kept.
func PrevPath(path string) string { return keyfile.PrevPath(path) }

// InitPath is the operator's init marker for the keyset at path.
func InitPath(path string) string { return keyfile.InitPath(path) }

// ValidatePath checks a keyset path: absolute and clean, naming a file.
func ValidatePath(path string) error { return keyfile.ValidatePath(path) }

// Inspect reads the keyset file at path and its header (keyfile.Inspect).
func Inspect(path string) (Info, error) { return keyfile.Inspect(path) }

// RequestInit creates the init marker PATH.init (keyfile.RequestInit).
func RequestInit(path string, now time.Time) (bool, error) { return keyfile.RequestInit(path, now) }
