// Package keystore is the parent's side of the enclave's sealed keyset
// (--key-mode sealed, docs/SEALING.md): it keeps the one sealed keyset in a
// file, hands it to the enclave, stores the one the enclave makes or
// rotates (compare-and-swap, atomically, keeping the replaced one beside
// it), and hands the enclave the instance role's AWS credentials for its
// KMS calls. It serves all of it as nitrosign.v1.HostService over vsock.
//
// The parent never sees a key in clear: the file is sealed under a data key
// that AWS KMS releases only to an attested enclave. What the parent can
// do, and this package does not, is withhold or roll back the file; the
// enclave checks what it gets.
//
// Files, for the keyset at PATH (default /var/lib/nitrosign/keyset.sealed):
//
//	PATH       the sealed keyset (internal/keysetfmt), mode 0600
//	PATH.prev  the keyset PATH replaced last
//	PATH.init  the operator's request for a new keyset (nitrosign keyset
//	           init); the next store of a keyset removes it
//
// A missing PATH alone never makes new keys: the enclave creates a keyset
// only when PATH.init exists, and the store takes a first keyset only then.
package keystore

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/nitrosign/nitrosign/host/keystore/keyfile"
	"github.com/nitrosign/nitrosign/internal/keysetfmt"
	"github.com/nitrosign/nitrosign/internal/limits"
)

// Errors of the store, each wrapped with the details; the gRPC service maps
// them to status codes (see statusOf).
var (
	// ErrInvalid: what the enclave sent is not a sealed keyset, or its
	// replaces_sha256 is malformed (InvalidArgument).
	ErrInvalid = errors.New("not a sealed keyset")
	// ErrChanged: the keyset on the host is not the one the store was to
	// replace (Aborted): another enclave stored one first.
	ErrChanged = errors.New("the host's sealed keyset changed")
	// ErrNoInit: a first keyset without the operator's init request
	// (FailedPrecondition).
	ErrNoInit = errors.New("no new keyset was requested")
	// ErrEmpty: the file at PATH is empty (FailedPrecondition). It is not
	// handed over as it is, as a corrupt file is: on the wire an empty
	// keyset means none, and the enclave would ask for an init instead
	// of reporting the loss.
	ErrEmpty = errors.New("sealed keyset file empty")
)

// Stored is what Get found.
type Stored struct {
	// Sealed is the file's bytes, nil when there is none. It is returned
	// as it is even when it does not parse: the enclave reports it as
	// corrupt, and nothing replaces it.
	Sealed []byte
	// InitRequested: there is no keyset and PATH.init exists.
	InitRequested bool
	// Location is PATH.
	Location string
}

// PutResult is what Put did.
type PutResult struct {
	// Location is PATH.
	Location string
	// PreviousLocation is PATH.prev when a keyset was replaced (or had
	// been, for a repeated Put of the keyset already stored), else "".
	PreviousLocation string
}

// Store keeps one sealed keyset in a file. It is safe for concurrent use;
// Puts are serialised, Gets read the file as the last rename left it.
type Store struct {
	path string
	log  *zap.Logger
	mu   sync.Mutex
	// corrupt throttles the warning about a file that does not parse
	// (each enclave reads it every RefreshInterval).
	corrupt *limits.Throttle
	// step, in tests, is called after each step of a Put; an error fails
	// the Put there, as a crash or an I/O error would.
	step func(name string) error
}

// NewStore returns the store of the keyset at path (see ValidatePath). It
// does no I/O; Check looks at the directory.
func NewStore(path string, log *zap.Logger) (*Store, error) {
	if err := ValidatePath(path); err != nil {
		return nil, err
	}
	return &Store{path: path, log: log.Named("keystore"), corrupt: limits.NewThrottle(time.Minute)}, nil
}

// Path is PATH.
func (s *Store) Path() string { return s.path }

// Check makes sure the directory is there (an error otherwise), removes
// the temporary files a crash in the middle of a Put may have left, and
// logs what the host holds (header only), or why it cannot be read. It is
// for start-up.
func (s *Store) Check() error {
	dir := filepath.Dir(s.path)
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("keyset directory: %w (the unit's StateDirectory=nitrosign creates /var/lib/nitrosign; or choose another --keyset-file)", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("keyset directory %s is not a directory", dir)
	}
	s.mu.Lock()
	s.removeTemps()
	s.mu.Unlock()
	info, err := Inspect(s.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		init, ierr := keyfile.Exists(InitPath(s.path))
		if ierr != nil {
			return ierr
		}
		fields := []zap.Field{zap.String("location", s.path), zap.Bool("init_requested", init)}
		if prev, _ := keyfile.Exists(PrevPath(s.path)); prev && !init {
			s.log.Warn("no sealed keyset, but a previous one is kept beside it: enclaves in sealed mode will not start until it is restored (mv "+
				PrevPath(s.path)+" "+s.path+") or a new keyset is requested (nitrosign keyset init, after moving it away)", fields...)
			return nil
		}
		s.log.Info("no sealed keyset yet", fields...)
		return nil
	case err != nil:
		// The proxy's other work goes on; enclaves are refused the file,
		// with this reason, until it is fixed.
		s.log.Error("the sealed keyset cannot be read: enclaves in sealed mode are refused it until it is fixed; the host never replaces or deletes it",
			zap.String("location", s.path), zap.Error(err))
		return nil
	case info.ParseErr != nil:
		s.log.Warn("the sealed keyset does not parse: it is handed to enclaves as it is, which refuse it, and it is never replaced or deleted by the host",
			zap.String("location", s.path), zap.Int64("bytes", info.Size), zap.String("sha256", info.SHA256), zap.String("error", info.ParseErr.Error()))
		return nil
	}
	s.log.Info("holding a sealed keyset", append([]zap.Field{zap.String("location", s.path), zap.String("sha256", info.SHA256)}, headerFields(info.Header)...)...)
	return nil
}

// Get returns the sealed keyset, or none and whether the operator asked for
// a new one. A file that does not parse is returned as it is (and a warning
// logged); a file larger than a keyset can be (ErrTooLarge), or empty
// (ErrEmpty), is refused.
func (s *Store) Get() (Stored, error) {
	b, err := keyfile.Read(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		init, err := keyfile.Exists(InitPath(s.path))
		if err != nil {
			return Stored{}, err
		}
		return Stored{InitRequested: init, Location: s.path}, nil
	}
	if err != nil {
		return Stored{}, err
	}
	if len(b) == 0 {
		return Stored{}, fmt.Errorf("%w: %s is empty, so it holds no keyset; the host never replaces it: restore %s or a backup (or, to start over, move it away and run nitrosign keyset init)",
			ErrEmpty, s.path, PrevPath(s.path))
	}
	if _, perr := keysetfmt.Parse(b); perr != nil {
		if ok, more := s.corrupt.Allow(); ok {
			sum := sha256.Sum256(b)
			s.log.Warn("handing enclaves a sealed keyset that does not parse: they will refuse it; the host never replaces or deletes it (restore "+
				PrevPath(s.path)+" or a backup)", zap.String("location", s.path), zap.Int("bytes", len(b)),
				zap.String("sha256", hex.EncodeToString(sum[:])), zap.String("error", perr.Error()), zap.Uint64("same_warnings_since_last_line", more))
		}
	}
	return Stored{Sealed: b, Location: s.path}, nil
}

// Put stores sealed in place of the keyset whose SHA-256 is replaces
// (empty: there must be none, and the operator must have asked for one).
// sealed must parse as a sealed keyset (ErrInvalid). When the host holds
// another keyset than replaces names, nothing is stored (ErrChanged). A
// Put of the very keyset stored already succeeds without a change, so that
// an enclave may repeat a Put whose answer it lost.
//
// The new file is written beside PATH, synced, then renamed over it; the
// replaced one is first hard-linked and renamed to PATH.prev, so that PATH
// holds a whole keyset at every instant, and the directory is synced. On
// success PATH.init is removed.
func (s *Store) Put(sealed, replaces []byte) (PutResult, error) {
	p, err := keysetfmt.Parse(sealed)
	if err != nil {
		return PutResult{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if len(replaces) != 0 && len(replaces) != sha256.Size {
		return PutResult{}, fmt.Errorf("%w: replaces_sha256 is %d bytes, want %d (or none for a first keyset)", ErrInvalid, len(replaces), sha256.Size)
	}
	newSum := sha256.Sum256(sealed)

	s.mu.Lock()
	defer s.mu.Unlock()
	cur, have, err := fileSum(s.path)
	if err != nil {
		return PutResult{}, err
	}
	res := PutResult{Location: s.path}
	if have && cur == newSum {
		if prev, _ := keyfile.Exists(PrevPath(s.path)); prev {
			res.PreviousLocation = PrevPath(s.path)
		}
		s.log.Info("sealed keyset stored already: nothing to change", zap.String("location", s.path), zap.String("sha256", hex.EncodeToString(newSum[:])))
		return res, nil
	}
	switch {
	case !have && len(replaces) != 0:
		return PutResult{}, fmt.Errorf("%w: the keyset to replace (sha256 %s) is gone, %s holds none", ErrChanged, short(replaces), s.path)
	case have && len(replaces) == 0:
		return PutResult{}, fmt.Errorf("%w: %s already holds a keyset (sha256 %s), stored by another enclave first: take that one", ErrChanged, s.path, short(cur[:]))
	case have && !bytes.Equal(cur[:], replaces):
		return PutResult{}, fmt.Errorf("%w: %s holds keyset sha256 %s, not %s that this one replaces: another enclave changed it first; read it again", ErrChanged, s.path, short(cur[:]), short(replaces))
	case !have:
		init, err := keyfile.Exists(InitPath(s.path))
		if err != nil {
			return PutResult{}, err
		}
		if !init {
			return PutResult{}, fmt.Errorf("%w: %s holds no keyset and %s does not exist: a first keyset is stored only after `nitrosign keyset init`", ErrNoInit, s.path, InitPath(s.path))
		}
	}
	if err := s.write(sealed, have); err != nil {
		return PutResult{}, err
	}
	if have {
		res.PreviousLocation = PrevPath(s.path)
	}
	initRemoved := false
	if err := os.Remove(InitPath(s.path)); err == nil {
		initRemoved = true
		_ = keyfile.SyncDir(filepath.Dir(s.path))
	} else if !errors.Is(err, fs.ErrNotExist) {
		// The keyset is stored; the marker matters only while there is none.
		s.log.Warn("stored the keyset but could not remove the init marker: remove it by hand", zap.String("marker", InitPath(s.path)), zap.Error(err))
	}
	s.log.Info("stored a new sealed keyset", append([]zap.Field{
		zap.String("location", s.path), zap.String("previous_location", res.PreviousLocation),
		zap.String("sha256", hex.EncodeToString(newSum[:])), zap.Int("bytes", len(sealed)), zap.Bool("init_marker_removed", initRemoved),
	}, headerFields(p.Header)...)...)
	return res, nil
}

// Put's steps, named for the test hook.
const (
	stepTempWritten = "temp written"
	stepPrevLinked  = "prev linked"
	stepPrevKept    = "prev kept"
	stepReplaced    = "replaced"
	stepDirSynced   = "dir synced"
)

// write puts sealed at PATH (see Put); keepPrev: PATH exists and goes to
// PATH.prev. A failure before the last rename leaves PATH and PATH.prev as
// they were, and removes the temporary files.
func (s *Store) write(sealed []byte, keepPrev bool) (err error) {
	dir, base := filepath.Split(s.path)
	tmp, err := os.CreateTemp(dir, tempPrefix(base)) // mode 0600
	if err != nil {
		return fmt.Errorf("keyset file: %w", err)
	}
	tmpName := tmp.Name()
	committed := false
	defer func() {
		if !committed {
			_ = os.Remove(tmpName)
		}
	}()
	if _, err := tmp.Write(sealed); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("keyset file: writing %s: %w", tmpName, err)
	}
	if err := tmp.Sync(); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("keyset file: syncing %s: %w", tmpName, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("keyset file: %w", err)
	}
	if err := s.hook(stepTempWritten); err != nil {
		return err
	}
	if keepPrev {
		// A hard link, renamed over PATH.prev: PATH stays where it is.
		link, err := linkTemp(s.path, dir, base)
		if err != nil {
			return err
		}
		if err := s.hook(stepPrevLinked); err != nil {
			_ = os.Remove(link)
			return err
		}
		if err := os.Rename(link, PrevPath(s.path)); err != nil {
			_ = os.Remove(link)
			return fmt.Errorf("keyset file: keeping the replaced keyset: %w", err)
		}
		if err := s.hook(stepPrevKept); err != nil {
			return err
		}
	}
	if err := os.Rename(tmpName, s.path); err != nil {
		return fmt.Errorf("keyset file: %w", err)
	}
	committed = true
	if err := s.hook(stepReplaced); err != nil {
		return err
	}
	// The renames are durable once the directory is.
	if err := keyfile.SyncDir(dir); err != nil {
		return fmt.Errorf("keyset file: syncing directory %s: %w", dir, err)
	}
	return s.hook(stepDirSynced)
}

func (s *Store) hook(step string) error {
	if s.step == nil {
		return nil
	}
	return s.step(step)
}

// tempPrefix is the pattern of Put's temporary files for base: hidden, and
// never PATH, PATH.prev or PATH.init.
func tempPrefix(base string) string { return "." + base + ".tmp-*" }

// linkTemp hard-links path to a new temporary name in dir.
func linkTemp(path, dir, base string) (string, error) {
	for range 8 {
		var r [8]byte
		_, _ = rand.Read(r[:])
		name := filepath.Join(dir, strings.Replace(tempPrefix(base), "*", "prev-"+hex.EncodeToString(r[:]), 1))
		err := os.Link(path, name)
		if err == nil {
			return name, nil
		}
		if !errors.Is(err, fs.ErrExist) {
			return "", fmt.Errorf("keyset file: keeping the replaced keyset: %w", err)
		}
	}
	return "", errors.New("keyset file: no free temporary name to keep the replaced keyset")
}

// removeTemps removes what an interrupted Put left (under s.mu).
func (s *Store) removeTemps() {
	dir, base := filepath.Split(s.path)
	names, _ := filepath.Glob(filepath.Join(dir, tempPrefix(base)))
	for _, n := range names {
		if err := os.Remove(n); err == nil {
			s.log.Info("removed a temporary file an interrupted store left", zap.String("file", n))
		}
	}
}

// fileSum is the SHA-256 of the file at path; false when there is none.
func fileSum(path string) (sum [sha256.Size]byte, ok bool, err error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return sum, false, nil
	}
	if err != nil {
		return sum, false, fmt.Errorf("keyset file: %w", err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return sum, false, fmt.Errorf("keyset file %s is not a regular file", path)
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return sum, false, fmt.Errorf("keyset file: %w", err)
	}
	copy(sum[:], h.Sum(nil))
	return sum, true, nil
}

// short is the first 16 hex digits of a SHA-256, for messages (nitrosign
// keyset show prints all of it).
func short(sum []byte) string {
	h := hex.EncodeToString(sum)
	if len(h) > 16 {
		return h[:16] + "..."
	}
	return h
}

// headerFields are the loggable fields of a header: no byte of the keyset.
func headerFields(h *keysetfmt.Header) []zap.Field {
	if h == nil {
		return nil
	}
	return []zap.Field{zap.Strings("key_ids", h.KeyIDs), zap.String("kms_key_arn", h.KMSKeyARN),
		zap.Time("created", h.Created), zap.Time("sealed", h.Sealed)}
}
