package sealing

import (
	"bytes"
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nitrosign/nitrosign/internal/keysetfmt"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// The sealed keyset is format 1 of package keysetfmt (docs/SEALING.md):
// a readable header (the format, the KMS key, the key ids, when it was
// made and sealed), KMS's CiphertextBlob of the data key, and the body,
// AES-256-GCM under the data key with every byte before it as associated
// data. The body, in clear only inside the enclave, is JSON:
//
//	{"keys":[{"id":hex SHA-256 of the SPKI,"type":"RSA"|"ECC"|"ED25519",
//	  "version":n,"state":"ENABLED"|"DISABLED","created":RFC 3339,
//	  "pkcs8":base64 PKCS #8}]}
//
// The header is readable without KMS (the host can show which keys a file
// holds), and bound to the body: changing any header byte, or swapping the
// data key blob for another file's, makes the body not open.

// ErrCorrupt is wrapped by every error about a sealed keyset that does not
// parse or does not open; nothing of it is used then.
var ErrCorrupt = keysetfmt.ErrCorrupt

// Header is the readable part of a sealed keyset.
type Header = keysetfmt.Header

// ErrWrongKMSKey: the keyset was sealed under another KMS key than the
// configured one.
var ErrWrongKMSKey = errors.New("sealing: sealed keyset is for another KMS key")

// State is whether a key may be selected for signing.
type State string

// Key states.
const (
	Enabled  State = "ENABLED"
	Disabled State = "DISABLED"
)

// Key is one key of a keyset.
type Key struct {
	// ID is KeyID of its public key (hex SHA-256 of the DER SPKI).
	ID      string
	Type    pb.KeyType
	Version int
	State   State
	Created time.Time
	Private crypto.Signer
}

// Keyset is every key an enclave serves, and when the set was made.
type Keyset struct {
	Created time.Time
	Keys    []Key
}

type bodyKey struct {
	ID      string    `json:"id"`
	Type    string    `json:"type"`
	Version int       `json:"version"`
	State   State     `json:"state"`
	Created time.Time `json:"created"`
	PKCS8   []byte    `json:"pkcs8"`
}

var typeNames = map[pb.KeyType]string{pb.KeyType_KEY_TYPE_RSA: "RSA", pb.KeyType_KEY_TYPE_ECC: "ECC", pb.KeyType_KEY_TYPE_ED25519: "ED25519"}

// keyID is the id of a public key: hex SHA-256 of its DER SPKI (as the
// signer computes it).
func keyID(pub crypto.PublicKey) (string, error) {
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(spki)
	return hex.EncodeToString(sum[:]), nil
}

// Seal encrypts ks under a new data key from KMS and returns the sealed
// keyset. Every key's id is checked against its public key first.
func Seal(ctx context.Context, ks *Keyset, keys *DataKeys, now time.Time) ([]byte, error) {
	if ks == nil || len(ks.Keys) == 0 {
		return nil, errors.New("sealing: an empty keyset")
	}
	body := struct {
		Keys []bodyKey `json:"keys"`
	}{}
	ids := make([]string, 0, len(ks.Keys))
	for _, k := range ks.Keys {
		name, ok := typeNames[k.Type]
		if !ok {
			return nil, fmt.Errorf("sealing: key %s of unknown type %v", k.ID, k.Type)
		}
		if k.State != Enabled && k.State != Disabled {
			return nil, fmt.Errorf("sealing: key %s in unknown state %q", k.ID, k.State)
		}
		id, err := keyID(k.Private.Public())
		if err != nil || id != k.ID {
			return nil, fmt.Errorf("sealing: key %s: its id is not its public key's", k.ID)
		}
		if !typeMatches(k.Type, k.Private) {
			return nil, fmt.Errorf("sealing: key %s: type %s does not match the key (%T)", k.ID, name, k.Private)
		}
		der, err := x509.MarshalPKCS8PrivateKey(k.Private)
		if err != nil {
			return nil, fmt.Errorf("sealing: key %s: %w", k.ID, err)
		}
		body.Keys = append(body.Keys, bodyKey{ID: k.ID, Type: name, Version: k.Version, State: k.State, Created: k.Created.UTC(), PKCS8: der})
		ids = append(ids, k.ID)
	}
	pt, err := json.Marshal(body)
	for i := range body.Keys {
		clear(body.Keys[i].PKCS8)
	}
	if err != nil {
		return nil, err
	}
	defer clear(pt)
	dk, blob, keyARN, err := keys.Generate(ctx)
	if err != nil {
		return nil, err
	}
	defer clear(dk)
	aad, err := keysetfmt.Frame(Header{KMSKeyARN: keyARN, KeyIDs: ids, Created: ks.Created.UTC(), Sealed: now.UTC()}, blob)
	if err != nil {
		return nil, fmt.Errorf("sealing: %w", err)
	}
	gcm, err := newGCM(dk)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, keysetfmt.NonceSize)
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	out := bytes.NewBuffer(bytes.Clone(aad))
	out.Write(nonce)
	out.Write(gcm.Seal(nil, nonce, pt, aad))
	return out.Bytes(), nil
}

// ReadHeader parses a sealed keyset's header, without KMS: the format,
// KMS key and key ids it declares, which Unseal then checks against the
// keys themselves.
func ReadHeader(sealed []byte) (*Header, error) { return keysetfmt.ReadHeader(sealed) }

// Unseal opens a sealed keyset: its header must name the KMS key keys
// uses, KMS must release the data key to this enclave, the body must open
// (so neither it nor the header was changed), and every key must be what
// the header lists, with an id that is its public key's.
func Unseal(ctx context.Context, sealed []byte, keys *DataKeys) (*Keyset, error) {
	p, err := keysetfmt.Parse(sealed)
	if err != nil {
		return nil, err
	}
	h := p.Header
	if isKeyARN(keys.KeyID()) && h.KMSKeyARN != keys.KeyID() {
		return nil, fmt.Errorf("%w: sealed under %s, the signer uses %s", ErrWrongKMSKey, h.KMSKeyARN, keys.KeyID())
	}
	dk, opened, err := keys.Open(ctx, p.Blob)
	if err != nil {
		return nil, err
	}
	defer clear(dk)
	if opened != h.KMSKeyARN {
		return nil, fmt.Errorf("%w: the header says %s, KMS opened it with %s", ErrWrongKMSKey, h.KMSKeyARN, opened)
	}
	gcm, err := newGCM(dk)
	if err != nil {
		return nil, err
	}
	pt, err := gcm.Open(nil, p.Nonce, p.Ciphertext, p.AAD)
	if err != nil {
		return nil, fmt.Errorf("%w: the keyset does not open with its data key (its header or body was changed)", ErrCorrupt)
	}
	defer clear(pt)
	var body struct {
		Keys []bodyKey `json:"keys"`
	}
	if err := json.Unmarshal(pt, &body); err != nil {
		return nil, fmt.Errorf("%w: keyset body does not parse", ErrCorrupt)
	}
	defer func() {
		for i := range body.Keys {
			clear(body.Keys[i].PKCS8)
		}
	}()
	ks := &Keyset{Created: h.Created}
	var ids []string
	for _, bk := range body.Keys {
		typ := pb.KeyType_KEY_TYPE_UNSPECIFIED
		for t, n := range typeNames {
			if n == bk.Type {
				typ = t
			}
		}
		if typ == pb.KeyType_KEY_TYPE_UNSPECIFIED || (bk.State != Enabled && bk.State != Disabled) {
			return nil, fmt.Errorf("%w: key %s has type %q, state %q", ErrCorrupt, bk.ID, bk.Type, bk.State)
		}
		priv, err := x509.ParsePKCS8PrivateKey(bk.PKCS8)
		if err != nil {
			return nil, fmt.Errorf("%w: key %s does not parse", ErrCorrupt, bk.ID)
		}
		signer, ok := priv.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("%w: key %s is not a signing key", ErrCorrupt, bk.ID)
		}
		if id, err := keyID(signer.Public()); err != nil || id != bk.ID {
			return nil, fmt.Errorf("%w: key %s: its id is not its public key's", ErrCorrupt, bk.ID)
		}
		if !typeMatches(typ, signer) {
			return nil, fmt.Errorf("%w: key %s: type %s does not match the key", ErrCorrupt, bk.ID, bk.Type)
		}
		ks.Keys = append(ks.Keys, Key{ID: bk.ID, Type: typ, Version: bk.Version, State: bk.State, Created: bk.Created, Private: signer})
		ids = append(ids, bk.ID)
	}
	if !slices.Equal(ids, h.KeyIDs) {
		return nil, fmt.Errorf("%w: the header lists other keys than the body holds", ErrCorrupt)
	}
	return ks, nil
}

// typeMatches reports whether priv is a key of type t.
func typeMatches(t pb.KeyType, priv crypto.Signer) bool {
	switch priv.(type) {
	case *rsa.PrivateKey:
		return t == pb.KeyType_KEY_TYPE_RSA
	case *ecdsa.PrivateKey:
		return t == pb.KeyType_KEY_TYPE_ECC
	case ed25519.PrivateKey:
		return t == pb.KeyType_KEY_TYPE_ED25519
	}
	return false
}

// isKeyARN reports whether id names one KMS key (not an alias or a bare
// id): then a sealed keyset must name the same.
func isKeyARN(id string) bool {
	return strings.HasPrefix(id, "arn:") && strings.Contains(id, ":key/")
}

func newGCM(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("sealing: %w", err)
	}
	return cipher.NewGCM(block)
}
