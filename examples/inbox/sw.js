// The inbox example's service worker: shows a pushed notification and opens its link when clicked. Herald's
// push payload is JSON: {type: "inbox", id, category, title, body, action_url?, avatar?, data?}.
self.addEventListener('push', (event) => {
  let n = {};
  try { n = event.data ? event.data.json() : {}; } catch { n = { title: event.data?.text() ?? '' }; }
  if (n.type !== 'inbox') return;
  event.waitUntil(self.registration.showNotification(n.title || 'New notification', {
    body: n.body || '',
    icon: n.avatar,
    tag: `inbox-${n.id}`,
    data: { url: n.action_url || '/', id: n.id },
  }));
});

self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  event.waitUntil(self.clients.openWindow(event.notification.data?.url || '/'));
});
