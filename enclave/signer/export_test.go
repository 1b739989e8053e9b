package signer

import "crypto"

// PrivateKeys exposes every key's private half, by key id, to the secrets
// test (secrets_test.go), which searches logs and answers for it. It is
// compiled into the test binary only: the package itself never hands a
// private key out.
func PrivateKeys(s *Signer) map[string]crypto.Signer {
	r := s.ring.Load()
	if r == nil {
		return nil
	}
	out := make(map[string]crypto.Signer, len(r.keys))
	for _, k := range r.keys {
		out[k.info.KeyId] = k.priv
	}
	return out
}
