package callauth

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"github.com/nitrosign/nitrosign/internal/keycommit"
)

// Key types of an identity, as NewIdentity takes them and Type reports them.
const (
	TypeEd25519 = "ed25519"
	TypeP256    = "p256"
)

// maxIdentityFile bounds what LoadIdentity reads: a PKCS#8 P-256 key in PEM
// is about 240 bytes, an Ed25519 one about 120.
const maxIdentityFile = 16 << 10

// ErrUnsupportedKey is wrapped when a key is neither Ed25519 nor ECDSA P-256.
var ErrUnsupportedKey = errors.New("callauth: unsupported key: want Ed25519 or ECDSA P-256")

// KeyID returns the id of a DER SubjectPublicKeyInfo: the lower-case hex
// SHA-256 of its bytes, the same scheme as the signing keys' ids
// (keycommit.KeyID).
func KeyID(spkiDER []byte) string { return keycommit.KeyID(spkiDER) }

// Identity is a caller's private key. Its String method never shows the
// key, so an Identity is safe to print by mistake.
type Identity struct {
	ed  ed25519.PrivateKey // set for TypeEd25519
	ec  *ecdsa.PrivateKey  // set for TypeP256
	pub Caller
}

// NewIdentity generates a new identity of kind TypeEd25519 or TypeP256.
func NewIdentity(kind string) (*Identity, error) {
	switch kind {
	case TypeEd25519:
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("callauth: generate Ed25519 key: %w", err)
		}
		return newIdentity(priv)
	case TypeP256:
		priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("callauth: generate ECDSA P-256 key: %w", err)
		}
		return newIdentity(priv)
	default:
		return nil, fmt.Errorf("%w: key type %q (want %s or %s)", ErrUnsupportedKey, kind, TypeEd25519, TypeP256)
	}
}

// newIdentity wraps a private key of a supported kind.
func newIdentity(priv any) (*Identity, error) {
	id := &Identity{}
	var pub any
	switch k := priv.(type) {
	case ed25519.PrivateKey:
		if len(k) != ed25519.PrivateKeySize {
			return nil, fmt.Errorf("%w: Ed25519 private key of %d bytes", ErrUnsupportedKey, len(k))
		}
		id.ed, pub = k, k.Public()
	case *ecdsa.PrivateKey:
		if k.Curve != elliptic.P256() {
			return nil, fmt.Errorf("%w: ECDSA key on %s", ErrUnsupportedKey, k.Curve.Params().Name)
		}
		id.ec, pub = k, &k.PublicKey
	default:
		return nil, fmt.Errorf("%w: %s", ErrUnsupportedKey, keyKind(priv))
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("callauth: encode public key: %w", err)
	}
	if id.pub, err = parseSPKI(der); err != nil {
		return nil, err
	}
	return id, nil
}

// keyKind names the kind of a key Go parsed, for an error message.
func keyKind(k any) string {
	switch k := k.(type) {
	case *rsa.PrivateKey, *rsa.PublicKey:
		return "an RSA key"
	case *ecdsa.PrivateKey:
		return "an ECDSA key on " + k.Curve.Params().Name
	case *ecdsa.PublicKey:
		return "an ECDSA key on " + k.Curve.Params().Name
	}
	// *ecdh.PrivateKey (X25519, from PKCS#8) and anything newer.
	return fmt.Sprintf("a key of type %T", k)
}

// LoadIdentity reads an identity from path: one PEM "PRIVATE KEY" block
// (unencrypted PKCS#8) holding an Ed25519 or ECDSA P-256 key, as Save
// writes it and as "openssl genpkey -algorithm ed25519" or "openssl
// genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256" make it. Errors
// name the file and what is wrong with it, never its content.
func LoadIdentity(path string) (*Identity, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("callauth: identity: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxIdentityFile+1))
	if err != nil {
		return nil, fmt.Errorf("callauth: identity: read %s: %w", path, err)
	}
	defer clear(b)
	if len(b) > maxIdentityFile {
		return nil, fmt.Errorf("callauth: identity %s: larger than %d bytes: not a private key file", path, maxIdentityFile)
	}
	id, err := parseIdentityPEM(b)
	if err != nil {
		return nil, fmt.Errorf("callauth: identity %s: %w", path, err)
	}
	return id, nil
}

// parseIdentityPEM parses the content of an identity file. Its errors never
// quote the content.
func parseIdentityPEM(b []byte) (*Identity, error) {
	blk, rest := pem.Decode(b)
	if blk == nil {
		return nil, errors.New("no PEM block: want a PEM PRIVATE KEY (PKCS#8) file")
	}
	defer clear(blk.Bytes)
	switch blk.Type {
	case "PRIVATE KEY":
	case "ENCRYPTED PRIVATE KEY":
		return nil, errors.New("the private key is encrypted: an identity file holds an unencrypted PKCS#8 key (protect it with file permissions)")
	case "EC PRIVATE KEY":
		return nil, errors.New(`a SEC 1 "EC PRIVATE KEY": convert it to PKCS#8 ("openssl pkcs8 -topk8 -nocrypt")`)
	case "RSA PRIVATE KEY":
		return nil, fmt.Errorf("%w: an RSA key", ErrUnsupportedKey)
	default:
		// The type line is the file's content: not quoted.
		return nil, errors.New("the PEM block is not a PRIVATE KEY (PKCS#8)")
	}
	if len(blk.Headers) != 0 {
		return nil, errors.New("the PEM block has headers: an identity file holds an unencrypted PKCS#8 key without headers")
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("more than one PEM block, or data after the key: an identity file holds one key only")
	}
	priv, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		// The parser's message may describe the DER it choked on: not
		// passed on.
		return nil, errors.New("the PRIVATE KEY block is not a valid PKCS#8 private key")
	}
	return newIdentity(priv)
}

// Save writes the identity to path as one PEM "PRIVATE KEY" block
// (PKCS#8), readable by LoadIdentity and openssl. The file is created with
// mode 0600 (less if the umask says so); an existing file is never
// overwritten (the error wraps fs.ErrExist). A file that could not be
// written completely is removed.
func (id *Identity) Save(path string) (err error) {
	if id == nil {
		return errors.New("callauth: save: nil identity")
	}
	var priv any = id.ed
	if id.ec != nil {
		priv = id.ec
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return fmt.Errorf("callauth: save identity: encode: %w", err)
	}
	defer clear(der)
	data := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	defer clear(data)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("callauth: save identity: refusing to overwrite %s: %w", path, fs.ErrExist)
	}
	if err != nil {
		return fmt.Errorf("callauth: save identity: %w", err)
	}
	defer func() {
		if cerr := f.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("callauth: save identity: %w", cerr)
		}
		if err != nil {
			_ = os.Remove(path)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("callauth: save identity: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("callauth: save identity: %w", err)
	}
	return nil
}

// Type is TypeEd25519 or TypeP256.
func (id *Identity) Type() string { return id.pub.Type() }

// KeyID is the identity's key id: the lower-case hex SHA-256 of its DER
// SubjectPublicKeyInfo.
func (id *Identity) KeyID() string { return id.pub.KeyID() }

// PublicKeyDER returns a copy of the DER SubjectPublicKeyInfo.
func (id *Identity) PublicKeyDER() []byte { return id.pub.PublicKeyDER() }

// PublicKeyPEM returns the public key as a PEM "PUBLIC KEY" block: what the
// operator puts in the enclave's caller policy.
func (id *Identity) PublicKeyPEM() []byte { return id.pub.PublicKeyPEM() }

// Public returns the identity's public key, as the enclave knows it.
func (id *Identity) Public() Caller { return id.pub }

// String describes the identity by type and key id; it never shows the
// private key. (A value receiver: an Identity printed by value is covered
// too.)
func (id Identity) String() string {
	return "callauth.Identity(" + id.pub.Type() + " " + id.pub.KeyID() + ")"
}

// GoString is String: %#v must not print the private key either.
func (id Identity) GoString() string { return id.String() }

// sign signs the signed bytes of a call (see the package documentation).
func (id *Identity) sign(signed []byte) ([]byte, error) {
	switch {
	case id.ed != nil:
		return ed25519.Sign(id.ed, signed), nil
	case id.ec != nil:
		sum := sha256.Sum256(signed)
		sig, err := ecdsa.SignASN1(rand.Reader, id.ec, sum[:])
		if err != nil {
			return nil, fmt.Errorf("callauth: ECDSA signature: %w", err)
		}
		return sig, nil
	}
	return nil, errors.New("callauth: empty identity (use NewIdentity or LoadIdentity)")
}

// Caller is a caller's public key, as the enclave's policy holds it: an
// Ed25519 or ECDSA P-256 key and its key id. The zero Caller verifies
// nothing.
type Caller struct {
	ed  ed25519.PublicKey
	ec  *ecdsa.PublicKey
	der []byte
	id  string
}

// ParsePublicKey parses a caller's public key: a DER SubjectPublicKeyInfo,
// or one PEM "PUBLIC KEY" block holding one (surrounding white space
// allowed), of an Ed25519 or ECDSA P-256 key. The DER must be the
// canonical encoding of the key (as x509.MarshalPKIXPublicKey and openssl
// write it), so that its key id is the one the caller computes.
func ParsePublicKey(b []byte) (Caller, error) {
	trimmed := bytes.TrimSpace(b)
	if bytes.HasPrefix(trimmed, []byte("-----BEGIN")) {
		blk, rest := pem.Decode(trimmed)
		switch {
		case blk == nil:
			return Caller{}, errors.New("callauth: public key: malformed PEM")
		case blk.Type != "PUBLIC KEY":
			return Caller{}, fmt.Errorf("callauth: public key: PEM block of type %q, want PUBLIC KEY (SubjectPublicKeyInfo)", truncate(blk.Type, 40))
		case len(bytes.TrimSpace(rest)) != 0:
			return Caller{}, errors.New("callauth: public key: more than one PEM block, or data after the key")
		}
		b = blk.Bytes
	}
	return parseSPKI(b)
}

// truncate bounds a string quoted in an error.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

func parseSPKI(der []byte) (Caller, error) {
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return Caller{}, fmt.Errorf("callauth: public key: not a DER SubjectPublicKeyInfo: %w", err)
	}
	c := Caller{der: bytes.Clone(der), id: KeyID(der)}
	switch k := pub.(type) {
	case ed25519.PublicKey:
		c.ed = k
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return Caller{}, fmt.Errorf("%w: %s", ErrUnsupportedKey, keyKind(k))
		}
		c.ec = k
	default:
		return Caller{}, fmt.Errorf("%w: %s", ErrUnsupportedKey, keyKind(pub))
	}
	canon, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil || !bytes.Equal(canon, der) {
		return Caller{}, errors.New("callauth: public key: the DER is not the key's canonical encoding, whose id would differ")
	}
	return c, nil
}

// Type is TypeEd25519 or TypeP256, or "" for the zero Caller.
func (c Caller) Type() string {
	switch {
	case c.ed != nil:
		return TypeEd25519
	case c.ec != nil:
		return TypeP256
	}
	return ""
}

// KeyID is the key id: the lower-case hex SHA-256 of PublicKeyDER.
func (c Caller) KeyID() string { return c.id }

// PublicKeyDER returns a copy of the DER SubjectPublicKeyInfo.
func (c Caller) PublicKeyDER() []byte { return bytes.Clone(c.der) }

// PublicKeyPEM returns the public key as a PEM "PUBLIC KEY" block.
func (c Caller) PublicKeyPEM() []byte {
	if c.der == nil {
		return nil
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: c.der})
}

// String is the type and key id.
func (c Caller) String() string {
	if c.id == "" {
		return "callauth.Caller(none)"
	}
	return "callauth.Caller(" + c.Type() + " " + c.id + ")"
}
