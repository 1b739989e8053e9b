// Package authz decides, inside the enclave, who may sign with which key
// and who may administer the keys: the parent instance and the host proxy
// are trusted with neither.
//
// The policy is a JSON file baked into the enclave image
// (Dockerfile.enclave copies deploy/policy.json to /etc/nitrosign/
// policy.json; --policy names it), so it is measured into PCR2 with the
// binary, and the attestation document commits to its SHA-256
// (internal/keycommit, version 2): a client verifying an attestation knows
// which policy guards the keys, and changing the policy changes the
// measurements the KMS key policy admits. docs/AUTHZ.md says why measured
// rather than sealed with the keyset.
//
//	{
//	  "version": 1,
//	  "callers": [
//	    {
//	      "name": "payments",
//	      "public_key": "-----BEGIN PUBLIC KEY-----\n...\n-----END PUBLIC KEY-----\n",
//	      "sign": [ { "key_types": ["ECC"], "key_ids": [], "algorithms": ["ECDSA_SHA_256"] } ],
//	      "admin": false
//	    }
//	  ]
//	}
//
// A caller is known by its public key (Ed25519 or ECDSA P-256, PEM SPKI);
// its id is the hex SHA-256 of the DER SPKI. A Sign is allowed when one of
// its "sign" rules matches: the key is listed by id in key_ids or its type
// in key_types (both empty: any key), and the algorithm used (the key's
// default when the request names none) is listed in algorithms (empty:
// any). "admin" allows KeyAdminService. Nothing else is allowed; a caller
// with neither rules nor admin can do nothing.
package authz

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/nitrosign/nitrosign/internal/callauth"
	"github.com/nitrosign/nitrosign/internal/sigalg"
	pb "github.com/nitrosign/nitrosign/proto/nitrosign/v1"
)

// MaxPolicySize bounds the policy file.
const MaxPolicySize = 1 << 20

// ErrPolicy is wrapped by every error about a policy file.
var ErrPolicy = errors.New("authz: policy")

// Policy is a parsed policy. It is immutable.
type Policy struct {
	raw     []byte
	sum     [32]byte
	callers map[string]*Caller // by key id
	names   []string
}

// Caller is one caller of the policy.
type Caller struct {
	Name  string
	KeyID string
	// Public is its public key (Ed25519 or ECDSA P-256).
	Public callauth.Caller
	Admin  bool
	rules  []rule
}

type rule struct {
	types []pb.KeyType
	ids   []string
	algs  []pb.SigningAlgorithm
}

type fileRule struct {
	KeyTypes   []string `json:"key_types"`
	KeyIDs     []string `json:"key_ids"`
	Algorithms []string `json:"algorithms"`
}

type fileCaller struct {
	Name      string     `json:"name"`
	PublicKey string     `json:"public_key"`
	Sign      []fileRule `json:"sign"`
	Admin     bool       `json:"admin"`
}

type file struct {
	Version int          `json:"version"`
	Callers []fileCaller `json:"callers"`
}

// Load reads and parses the policy file at path.
func Load(path string) (*Policy, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrPolicy, err)
	}
	defer f.Close()
	raw, err := io.ReadAll(io.LimitReader(f, MaxPolicySize+1))
	if err != nil {
		return nil, fmt.Errorf("%w: reading %s: %w", ErrPolicy, path, err)
	}
	if len(raw) > MaxPolicySize {
		return nil, fmt.Errorf("%w: %s is over %d bytes", ErrPolicy, path, MaxPolicySize)
	}
	return Parse(raw)
}

// Parse parses a policy; every mistake is reported with the caller and
// field it is in.
func Parse(raw []byte) (*Policy, error) {
	var f file
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("%w: not valid policy JSON: %w", ErrPolicy, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: trailing data after the policy object", ErrPolicy)
	}
	if f.Version != 1 {
		return nil, fmt.Errorf("%w: version %d, this enclave reads version 1", ErrPolicy, f.Version)
	}
	p := &Policy{raw: bytes.Clone(raw), sum: sha256.Sum256(raw), callers: map[string]*Caller{}}
	seen := map[string]bool{}
	var errs []error
	for i, fc := range f.Callers {
		c, err := parseCaller(fc)
		if err != nil {
			errs = append(errs, fmt.Errorf("%w: caller %d (%q): %w", ErrPolicy, i, fc.Name, err))
			continue
		}
		if seen[c.Name] {
			errs = append(errs, fmt.Errorf("%w: caller name %q appears twice", ErrPolicy, c.Name))
		}
		seen[c.Name] = true
		if _, dup := p.callers[c.KeyID]; dup {
			errs = append(errs, fmt.Errorf("%w: caller %q has the public key of another caller", ErrPolicy, c.Name))
		}
		p.callers[c.KeyID] = c
		p.names = append(p.names, c.Name)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return p, nil
}

func parseCaller(fc fileCaller) (*Caller, error) {
	if fc.Name == "" || len(fc.Name) > 64 || strings.ContainsFunc(fc.Name, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return nil, errors.New("name must be 1 to 64 printable characters")
	}
	blk, rest := pem.Decode([]byte(fc.PublicKey))
	if blk == nil || blk.Type != "PUBLIC KEY" || len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New(`public_key must be one PEM "PUBLIC KEY" block`)
	}
	// callauth parses it as the enclave will verify with it: Ed25519 or
	// ECDSA P-256 only, and its key id.
	cp, err := callauth.ParsePublicKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("public_key: %w", err)
	}
	c := &Caller{Name: fc.Name, KeyID: cp.KeyID(), Public: cp, Admin: fc.Admin}
	for j, fr := range fc.Sign {
		var r rule
		for _, t := range fr.KeyTypes {
			kt, ok := keyTypes[strings.ToUpper(t)]
			if !ok {
				return nil, fmt.Errorf("sign rule %d: key type %q: want RSA, ECC or ED25519", j, t)
			}
			r.types = append(r.types, kt)
		}
		for _, id := range fr.KeyIDs {
			if len(id) != 64 || strings.Trim(id, "0123456789abcdef") != "" {
				return nil, fmt.Errorf("sign rule %d: key id %q: want 64 lower-case hex characters", j, id)
			}
			r.ids = append(r.ids, id)
		}
		for _, a := range fr.Algorithms {
			alg, err := sigalg.Parse(a)
			if err != nil || alg == pb.SigningAlgorithm_SIGNING_ALGORITHM_UNSPECIFIED {
				return nil, fmt.Errorf("sign rule %d: algorithm %q: want a KMS algorithm name, e.g. ECDSA_SHA_256", j, a)
			}
			r.algs = append(r.algs, alg)
		}
		c.rules = append(c.rules, r)
	}
	return c, nil
}

var keyTypes = map[string]pb.KeyType{"RSA": pb.KeyType_KEY_TYPE_RSA, "ECC": pb.KeyType_KEY_TYPE_ECC, "ED25519": pb.KeyType_KEY_TYPE_ED25519}

// SHA256 is the policy file's SHA-256: what the attestation commits to.
func (p *Policy) SHA256() [32]byte { return p.sum }

// Raw is the policy file as it was read (it holds only public keys).
func (p *Policy) Raw() []byte { return bytes.Clone(p.raw) }

// Caller returns the caller whose public key has id keyID.
func (p *Policy) Caller(keyID string) (*Caller, bool) {
	c, ok := p.callers[keyID]
	return c, ok
}

// Names lists the callers' names, in file order.
func (p *Policy) Names() []string { return slices.Clone(p.names) }

// MaySign reports whether c may sign with the key (id, type) using alg.
func (c *Caller) MaySign(keyID string, keyType pb.KeyType, alg pb.SigningAlgorithm) bool {
	for _, r := range c.rules {
		keyOK := len(r.types) == 0 && len(r.ids) == 0 || slices.Contains(r.types, keyType) || slices.Contains(r.ids, keyID)
		algOK := len(r.algs) == 0 || slices.Contains(r.algs, alg)
		if keyOK && algOK {
			return true
		}
	}
	return false
}
