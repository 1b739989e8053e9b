package keystore

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/nitrosign/nitrosign/internal/keysetfmt"
)

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
	b, err := readKeyset(path)
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
		ok, err := exists(p)
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
	if err := syncDir(dir); err != nil {
		return true, fmt.Errorf("init marker %s written, but syncing %s failed: %w", marker, dir, err)
	}
	return true, nil
}
