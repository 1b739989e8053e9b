// Package keyfile is the layout of the sealed keyset's files on the parent
// instance, and what can be done with them without KMS, a network or an
// enclave: read one (bounded), read its header, request a new keyset. The
// host service (package keystore) and the operator's CLI (nitrosign keyset)
// share it; it depends on nothing but the file format (internal/keysetfmt).
//
// For the keyset at PATH (default /var/lib/nitrosign/keyset.sealed):
//
//	PATH       the sealed keyset (internal/keysetfmt), mode 0600
//	PATH.prev  the keyset PATH replaced last
//	PATH.init  the operator's request for a new keyset (nitrosign keyset
//	           init); the next store of a keyset removes it
package keyfile

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nitrosign/nitrosign/internal/keysetfmt"
)

// DefaultPath is where the sealed keyset lives: in the proxy's systemd
// StateDirectory (deploy/nitrosign-proxy.service).
const DefaultPath = "/var/lib/nitrosign/keyset.sealed"

// Suffixes of the files beside PATH.
const (
	PrevSuffix = ".prev"
	InitSuffix = ".init"
)

// PrevPath is where the keyset PATH replaced last is kept.
func PrevPath(path string) string { return path + PrevSuffix }

// InitPath is the operator's init marker for the keyset at path.
func InitPath(path string) string { return path + InitSuffix }

// Errors, each wrapped with the details.
var (
	// ErrTooLarge: the file at PATH is larger than any sealed keyset.
	ErrTooLarge = errors.New("sealed keyset file too large")
	// ErrExists: RequestInit refused, a keyset exists.
	ErrExists = errors.New("a keyset exists")
)

// ValidatePath checks a keyset path: absolute and clean, naming a file.
func ValidatePath(path string) error {
	switch {
	case path == "":
		return errors.New("keyset file: empty; want an absolute path such as " + DefaultPath)
	case !filepath.IsAbs(path):
		return fmt.Errorf("keyset file %q: want an absolute path such as %s", path, DefaultPath)
	case filepath.Dir(path) == path:
		return fmt.Errorf("keyset file %q: names a directory, want a file in one", path)
	case filepath.Clean(path) != path || strings.HasSuffix(path, "/"):
		return fmt.Errorf("keyset file %q: want a clean path to a file (%s)", path, filepath.Clean(path))
	}
	return nil
}

// SyncDir makes the directory's entries (renames, removals) durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Read reads the file at path, refusing one larger than a sealed
// keyset can be, and anything but a regular file (without blocking on a
// FIFO).
func Read(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("keyset file %s is not a regular file (%s)", path, fi.Mode().Type())
	}
	if fi.Size() > keysetfmt.MaxSize {
		return nil, tooLarge(path, fi.Size())
	}
	b, err := io.ReadAll(io.LimitReader(f, keysetfmt.MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("keyset file: %w", err)
	}
	if len(b) > keysetfmt.MaxSize {
		return nil, tooLarge(path, int64(len(b)))
	}
	return b, nil
}

func tooLarge(path string, size int64) error {
	return fmt.Errorf("%w: %s is %d bytes, and a sealed keyset is at most %d: it is not one; move it away and restore %s or a backup",
		ErrTooLarge, path, size, keysetfmt.MaxSize, PrevPath(path))
}

// Exists reports whether path exists; errors other than "does not exist"
// are returned.
func Exists(path string) (bool, error) {
	_, err := os.Lstat(path)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	}
	return false, fmt.Errorf("keyset file: %w", err)
}

// Info is what Inspect read of a keyset file: its readable header, never a
// key (the host has none).
type Info struct {
	Path string
	// Size is the file's size in bytes; SHA256 the hex SHA-256 of it (what
	// an enclave names in replaces_sha256).
	Size   int64
	SHA256 string
	// Header is nil when the file does not parse; ParseErr says why.
	Header   *keysetfmt.Header
	ParseErr error
}

// Inspect reads the keyset file at path and its header. It fails with an
// error wrapping fs.ErrNotExist when there is none, ErrTooLarge when it is
// larger than a sealed keyset can be; a file that does not parse is not an
// error (Info.ParseErr).
func Inspect(path string) (Info, error) {
	b, err := Read(path)
	if err != nil {
		return Info{}, err
	}
	sum := sha256.Sum256(b)
	info := Info{Path: path, Size: int64(len(b)), SHA256: hex.EncodeToString(sum[:])}
	info.Header, info.ParseErr = keysetfmt.ReadHeader(b)
	return info, nil
}

// RequestInit creates the init marker PATH.init: the operator's request for
// a new keyset, which the next enclave to ask the host creates, seals and
// stores. It refuses (ErrExists) when PATH or PATH.prev exists, so that no
// keyset is ever replaced by accident. created is false when the marker
// was there already (the request stands).
func RequestInit(path string, now time.Time) (created bool, err error) {
	if err := ValidatePath(path); err != nil {
		return false, err
	}
	for _, p := range []string{path, PrevPath(path)} {
		ok, err := Exists(p)
		if err != nil {
			return false, err
		}
		if ok {
			return false, fmt.Errorf("%w (%s): init would replace nothing but is refused so that no keyset is ever replaced by accident", ErrExists, p)
		}
	}
	dir := filepath.Dir(path)
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		if err == nil {
			err = errors.New("not a directory")
		}
		return false, fmt.Errorf("keyset directory %s: %w (nitrosign-proxy.service's StateDirectory=nitrosign creates /var/lib/nitrosign: start the unit once, or give --file)", dir, err)
	}
	marker := InitPath(path)
	f, err := os.OpenFile(marker, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("init marker: %w", err)
	}
	_, werr := fmt.Fprintf(f, "requested by nitrosign keyset init at %s\n", now.UTC().Format(time.RFC3339))
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		_ = os.Remove(marker)
		return false, fmt.Errorf("init marker: %w", werr)
	}
	if err := SyncDir(dir); err != nil {
		return true, fmt.Errorf("init marker %s written, but syncing %s failed: %w", marker, dir, err)
	}
	return true, nil
}
